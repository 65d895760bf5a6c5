# syntax=docker/dockerfile:1

# hit-counter: one static binary in an empty image.
#
# The builder is the official Rust image on Alpine, whose native target is musl: the binary is
# static and built for the host's own architecture (linux/amd64 or linux/arm64; no target is
# hard-coded). The Rust version is pinned to the one the project is tested with.
FROM rust:1.95.0-alpine AS build
# musl-dev: C headers for mimalloc (the allocator the musl build uses, see README).
RUN apk add --no-cache musl-dev
WORKDIR /src

# Dependencies first, in their own layer: a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --locked --release \
 && rm -rf src

COPY src ./src
# COPY keeps the context's timestamps, which can be older than the placeholder build above.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    touch src/main.rs src/lib.rs \
 && cargo build --locked --release \
 && cp target/release/hit-counter /hit-counter

FROM scratch
COPY --from=build /hit-counter /hit-counter
# Not root, by number: scratch has no /etc/passwd.
USER 10001:10001
EXPOSE 5000
STOPSIGNAL SIGTERM
# Liveness through the binary itself (no curl in the image): GET /livez, 2 s budget.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/hit-counter", "healthcheck"]
ENTRYPOINT ["/hit-counter"]
