#!/bin/sh
# The official HAProxy image's entry point.
set -e

# `docker run <image> -f /path/haproxy.cfg` (the first argument an option) runs haproxy.
if [ "${1#-}" != "$1" ]; then
  set -- haproxy "$@"
fi

# haproxy in master-worker mode (-W: a master process starts the worker, passes signals on and
# reloads it on SIGUSR2) and in the foreground (-db), as the container's main process.
if [ "$1" = haproxy ]; then
  shift
  set -- haproxy -W -db "$@"
fi

exec "$@"
