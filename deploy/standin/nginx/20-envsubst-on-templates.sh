#!/bin/sh
# As the official nginx image does at start-up: every $NGINX_ENVSUBST_TEMPLATE_DIR/**/*$SUFFIX
# (default /etc/nginx/templates/*.template) is rendered with envsubst into
# $NGINX_ENVSUBST_OUTPUT_DIR (default /etc/nginx/conf.d), keeping subdirectories and dropping the
# suffix. Only environment variables whose names match the extended regular expression
# $NGINX_ENVSUBST_FILTER (default: all) are substituted; every other $name is left as written,
# which is what keeps nginx's own $variables intact.
set -e

ME=$(basename "$0")

entrypoint_log() {
  if [ -z "${NGINX_ENTRYPOINT_QUIET_LOGS:-}" ]; then
    echo "$@"
  fi
}

auto_envsubst() {
  template_dir="${NGINX_ENVSUBST_TEMPLATE_DIR:-/etc/nginx/templates}"
  suffix="${NGINX_ENVSUBST_TEMPLATE_SUFFIX:-.template}"
  output_dir="${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}"
  filter="${NGINX_ENVSUBST_FILTER:-}"

  # "${A} ${B} ...": the defined variables whose names match the filter (envsubst's SHELL-FORMAT).
  defined_envs=$(printf '${%s} ' $(awk "END { for (name in ENVIRON) { print ( name ~ /${filter}/ ) ? name : \"\" } }" </dev/null))
  [ -d "$template_dir" ] || return 0
  if [ ! -w "$output_dir" ]; then
    entrypoint_log "$ME: ERROR: $template_dir exists, but $output_dir is not writable"
    return 0
  fi
  find "$template_dir" -follow -type f -name "*$suffix" -print | while read -r template; do
    relative_path="${template#"$template_dir/"}"
    output_path="$output_dir/${relative_path%"$suffix"}"
    subdir=$(dirname "$relative_path")
    mkdir -p "$output_dir/$subdir"
    entrypoint_log "$ME: Running envsubst on $template to $output_path"
    envsubst "$defined_envs" <"$template" >"$output_path"
  done
}

auto_envsubst

exit 0
