# hit-counter: one static binary in an empty image.
#
# The builder is the official Debian-based Rust image, pinned to the Rust version the project is
# tested with. The binary is built for the musl target of the build machine's own architecture
# (x86_64 or aarch64, from `uname -m`; no target is hard-coded), so it is static and runs in
# `scratch`. RUST_IMAGE is the only thing a build may change: deploy/standin/compose.yml points
# it at the offline stand-in that scripts/images builds (musl-tools, the musl target and the
# project's crates already inside).
ARG RUST_IMAGE=rust:1.95.0-slim-bookworm
# checkov:skip=CKV_DOCKER_7: the tag is RUST_IMAGE's, pinned on the line above (checkov does not read ARGs)
FROM ${RUST_IMAGE} AS build
# On every image of this stage (the classic builder keeps them as cache, and `docker compose
# down --rmi local` removes only the tagged image): `docker image prune --filter
# label=org.hit-counter.stage=build` removes the stale ones.
LABEL org.hit-counter.stage=build
# musl-gcc compiles mimalloc (the allocator of the musl build, see docs/performance.md) for the musl target.
RUN if ! command -v musl-gcc >/dev/null; then \
      apt-get update \
      && apt-get install -y --no-install-recommends musl-tools \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && rustup target add "$(uname -m)-unknown-linux-musl"
WORKDIR /src

# Dependencies first, in their own layer: a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --locked --release --target "$(uname -m)-unknown-linux-musl" \
 && rm -rf src

COPY src ./src
# COPY keeps the context's timestamps, which can be older than the placeholder build above.
# The binary must be static: no program interpreter, no shared library.
RUN touch src/main.rs src/lib.rs \
 && cargo build --locked --release --target "$(uname -m)-unknown-linux-musl" \
 && cp "target/$(uname -m)-unknown-linux-musl/release/hit-counter" /hit-counter \
 && readelf -lW /hit-counter > /tmp/program-headers \
 && readelf -dW /hit-counter > /tmp/dynamic-section \
 && if grep -q INTERP /tmp/program-headers || grep -q NEEDED /tmp/dynamic-section; then \
      echo "hit-counter is dynamically linked" >&2; exit 1; \
    fi

FROM scratch
# Lets `docker image prune --filter label=org.hit-counter.stage` find this stage's untagged
# leftovers too; a tagged image is never pruned.
LABEL org.hit-counter.stage=image
COPY --from=build /hit-counter /hit-counter
# Not root, by number: scratch has no /etc/passwd.
USER 10001:10001
EXPOSE 5000
STOPSIGNAL SIGTERM
# Liveness through the binary itself (no curl in the image): GET /livez, 2 s budget.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/hit-counter", "healthcheck"]
ENTRYPOINT ["/hit-counter"]
