#!/bin/sh
# The official Redis image's entry point, as far as the project relies on it, plus what the
# official image gets from its build instead: protected mode off.
set -e

# `docker run <image> --appendonly yes` and `docker run <image> /path/redis.conf` run redis-server.
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
  set -- redis-server "$@"
fi

# Started as root (the default): give /data to redis, then run this script again as redis.
if [ "$1" = redis-server ] && [ "$(id -u)" = 0 ]; then
  find . \! -user redis -exec chown redis '{}' +
  exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi

# The official image compiles Redis with protected mode off by default, so other containers can
# connect when no config file is given; Debian's redis-server keeps it on and refuses them. Same
# behaviour here: without a config file (the first argument), --protected-mode no comes first,
# so an explicit --protected-mode on the command line still wins.
if [ "$1" = redis-server ]; then
  case "${2:-}" in
    "" | -*)
      shift
      set -- redis-server --protected-mode no "$@"
      ;;
  esac
fi

# Files created by Redis readable by it alone, unless the caller chose a umask.
if [ "$(umask)" = 0022 ]; then
  umask 0077
fi

exec "$@"
