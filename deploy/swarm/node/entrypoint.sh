#!/bin/sh
# The node's engine. vfs: the node's /var/lib/docker is a tmpfs inside a container, where
# overlayfs cannot stack. INSECURE_REGISTRY: the cluster's registry (plain HTTP, reachable
# only on the cluster's bridge network). Further arguments go to dockerd.
#
# The node's containers get their cgroups below the node container's own (the host's cgroup
# tree is mounted at /sys/fs/cgroup): pausing the node then freezes its containers too, as a
# machine that hangs, and removing the node removes their cgroups. Without it they are the
# host's /docker/<id>, which a pause does not freeze and which outlive the node.
set -e
parent=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ { print $3 }' /proc/self/cgroup)
exec dockerd --storage-driver=vfs ${parent:+--cgroup-parent="$parent/node"} \
  ${INSECURE_REGISTRY:+--insecure-registry="$INSECURE_REGISTRY"} "$@"
