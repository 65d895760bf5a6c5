#!/bin/sh
# The entry point of a Redis node or a Sentinel of the highly available set on a Docker Swarm
# (deploy/swarm/stack.yml; README.md here says why each setting). It runs in the Redis image
# (the official one or the stand-in: POSIX sh, redis-cli, timeout) and ends by handing over to
# the image's own entry point, which gives /data to the redis user and drops to it:
#
#   swarm-entrypoint.sh node       a Redis node: renders redis.conf, then starts as the replica
#                                  of the current primary, or as the primary
#   swarm-entrypoint.sh sentinel   a Sentinel: renders sentinel.conf once (Sentinel rewrites it
#                                  and needs what it wrote: epoch, primary, known peers)
#
# Environment (stack.yml sets it):
#   REDIS_HA_HOST       this task's name as every other one reaches it: the service name
#                       (redis-1, sentinel-2, ...), which Swarm's DNS resolves to the task's
#                       address wherever it runs; it is what the node announces to the
#                       Sentinels, and what HAProxy compares their answers with
#   REDIS_HA_NODES      the three nodes' names     REDIS_HA_SENTINELS  the three Sentinels' names
#   REDIS_HA_INITIAL    the node that is primary when the set starts for the first time
#   REDIS_PORT          the nodes' port            SENTINEL_PORT       the Sentinels' port
#   REDIS_HA_TEMPLATES  where redis.conf and sentinel.conf (the templates) are mounted
#
# How a node picks its role. A node that comes back (its task restarted, its node back after
# Swarm gave up on it) must not start as a primary with its old data while another node has
# been promoted: the Sentinels are asked first, and their majority decides. In order:
#   1. 2 of 3 Sentinels name another node: a replica of it.
#   2. They name this node (it restarted before they failed over): the primary again, with
#      its AOF, unless another node is a replica they can promote that holds data. Then it
#      waits, not answering, until they do (at most 30 s): that replica holds every write
#      acknowledged with WAIT, while this node's AOF may lack the last second (appendfsync
#      everysec), and as the primary it would make the replicas resync to its shorter history.
#   3. No Sentinel answers for 5 s (the first start, or all of them gone): the node that says
#      role:master, else REDIS_HA_INITIAL.
# As a replica it starts with replica-priority 0 (never promoted) and gets the template's
# priority back once its first sync is done: a replica that never synced would otherwise be
# promoted when it is the only one left, and the count would restart from what it holds.
set -eu

role=${1:-}
me=${REDIS_HA_HOST:?the name of this task}
nodes=${REDIS_HA_NODES:-redis-1 redis-2 redis-3}
sentinels=${REDIS_HA_SENTINELS:-sentinel-1 sentinel-2 sentinel-3}
initial=${REDIS_HA_INITIAL:-redis-1}
redis_port=${REDIS_PORT:-6379}
sentinel_port=${SENTINEL_PORT:-26379}
templates=${REDIS_HA_TEMPLATES:-/usr/local/etc/redis-ha}
data=/data

# PID 1 until the exec below: without a trap, SIGTERM would wait for the stop timeout.
trap 'exit 143' TERM INT

log() { echo "redis-ha $role $me: $*" >&2; }

# redis-cli with a deadline (a frozen node must not hang the start); nothing on failure.
cli() {
  host=$1 port=$2
  shift 2
  timeout 1 redis-cli --raw -h "$host" -p "$port" "$@" 2>/dev/null || true
}

is_node() { case " $nodes " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# The Sentinels' answers (one node name a line; other Sentinels only, with "others").
sentinel_answers() {
  for s in $sentinels; do
    [ "${1:-}" != others ] || [ "$s" != "$me" ] || continue
    answer=$(cli "$s" "$sentinel_port" SENTINEL get-master-addr-by-name hits | head -n 1)
    if is_node "$answer"; then echo "$answer"; fi
  done
}

# The node 2 or more Sentinels name, if any.
majority() { sort | uniq -c | awk '$1 >= 2 { print $2; exit }'; }

# The first other node that says it is a primary.
node_saying_master() {
  for n in $nodes; do
    [ "$n" != "$me" ] || continue
    if [ "$(cli "$n" "$redis_port" ROLE | head -n 1)" = master ]; then echo "$n"; return; fi
  done
}

# Another node is a replica Sentinel can promote (replica-priority > 0: synced once, see below)
# and holds keys. INFO answers on a replica that answers nothing else.
candidate_elsewhere() {
  for n in $nodes; do
    [ "$n" != "$me" ] || continue
    if cli "$n" "$redis_port" INFO | tr -d '\r' | awk -F: '
        $1 == "role" { replica = $2 == "slave" } $1 == "slave_priority" { priority = $2 }
        $1 ~ /^db[0-9]+$/ { keys = 1 } END { exit !(replica && priority > 0 && keys) }'; then
      return 0
    fi
  done
  return 1
}

has_data() { [ -n "$(ls -A "$data/appendonlydir" 2>/dev/null)" ]; }

# The template with this task's values. bind and bind-source-addr name the host in the
# template (on loopback each process has an address of its own); here the task listens on
# its own addresses and connects from them, which the later lines say (the last one wins).
render() {
  sed -e "s|@HOST@|$me|g" -e "s|@PORT@|$2|g" -e "s|@DIR@|$data|g" \
    -e "s|@PRIMARY_HOST@|${3:-}|g" -e "s|@REDIS_PORT@|$redis_port|g" "$templates/$1"
  printf '\n# Swarm (swarm-entrypoint.sh): every address of the task, outgoing from any.\nbind 0.0.0.0\nbind-source-addr ""\n'
}

node() {
  primary=""
  waited=0
  while [ -z "$primary" ]; do
    answers=$(sentinel_answers)
    named=$(echo "$answers" | majority)
    if [ -n "$named" ] && [ "$named" != "$me" ]; then
      primary=$named
    elif [ "$named" = "$me" ]; then
      if ! candidate_elsewhere; then
        primary=$me
      elif [ "$waited" -ge 60 ]; then
        primary=$me
        log "no failover in 30 s: starting as the primary"
      elif [ $((waited % 10)) = 0 ]; then
        log "the Sentinels name this node, and a synced replica holds data: waiting for a failover"
      fi
    elif [ -z "$answers" ] && [ "$waited" -ge 10 ]; then
      primary=$(node_saying_master)
      primary=${primary:-$initial}
      log "no Sentinel answers: taking $primary as the primary"
    fi
    if [ -z "$primary" ]; then
      waited=$((waited + 1))
      sleep 0.5
    fi
  done

  render redis.conf "$redis_port" >"$data/redis.conf"
  if [ "$primary" = "$me" ]; then
    log "starting as the primary ($(has_data && echo "with its AOF" || echo empty))"
  else
    log "starting as a replica of $primary, replica-priority 0 until its first sync"
    priority=$(awk '$1 == "replica-priority" { p = $2 } END { print p }' "$data/redis.conf")
    printf 'replica-priority 0\nreplicaof %s %s\n' "$primary" "$redis_port" >>"$data/redis.conf"
    # In the background, past the exec: the template's priority back once the link is up, kept
    # in the file (CONFIG REWRITE) for Sentinel's own rewrites.
    (
      until cli 127.0.0.1 "$redis_port" INFO replication | grep -q '^master_link_status:up'; do sleep 0.5; done
      cli 127.0.0.1 "$redis_port" CONFIG SET replica-priority "${priority:-100}" >/dev/null
      cli 127.0.0.1 "$redis_port" CONFIG REWRITE >/dev/null
      log "first sync done: replica-priority ${priority:-100}"
    ) &
  fi
  exec docker-entrypoint.sh redis-server "$data/redis.conf"
}

# Sentinel 7.0 resolves the new primary's name when it switches to it, and when that fails it
# keeps the old primary under the new configuration epoch (sentinel.c ignores the error):
# from then on it names the old primary, and once that one answers again it makes the real
# primary its replica, which throws away every write since the failover. Swarm's DNS fails
# names for tens of seconds after a node comes back (SWARM.md). So a Sentinel's names come
# from /etc/hosts, which glibc reads before DNS: the last address Swarm's DNS gave for each
# node and Sentinel, asked again every half second; while DNS fails, the last one stays.
cache_names() {
  own=$(grep -v ' # redis-ha$' /etc/hosts)
  written=""
  while :; do
    lines=""
    for n in $nodes $sentinels; do
      ip=$(timeout 1 getent -s dns ahostsv4 "$n" | awk 'NR == 1 { print $1 }') || true
      [ -n "$ip" ] || ip=$(awk -v n="$n" '$2 == n && $3 == "#" { print $1 }' /etc/hosts)
      [ -z "$ip" ] || lines="$lines$ip $n # redis-ha
"
    done
    # In place (Docker bind-mounts the file), and only when an address changed.
    if [ "$lines" != "$written" ]; then
      if printf '%s\n%s' "$own" "$lines" >/etc/hosts; then written=$lines; else log "cannot write /etc/hosts"; fi
    fi
    sleep 0.5
  done
}

sentinel() {
  cache_names &
  if [ -s "$data/sentinel.conf" ]; then
    log "starting with the configuration it rewrote ($data/sentinel.conf)"
  else
    # A first start: the primary the other Sentinels name, else the node that says so, else
    # the initial one. A wrong guess is corrected by the others' hello messages (a higher
    # configuration epoch wins).
    primary=$(sentinel_answers others | head -n 1)
    [ -n "$primary" ] || primary=$(node_saying_master)
    primary=${primary:-$initial}
    log "first start, monitoring $primary"
    render sentinel.conf "$sentinel_port" "$primary" >"$data/sentinel.conf"
  fi
  exec docker-entrypoint.sh redis-server "$data/sentinel.conf" --sentinel
}

case "$role" in
  node) node ;;
  sentinel) sentinel ;;
  *) echo "usage: swarm-entrypoint.sh node|sentinel" >&2; exit 2 ;;
esac
