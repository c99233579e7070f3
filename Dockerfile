# One image for both binaries: `api` (the default command) and `worker`.
# Builds without a database (compile-checked queries come from the committed .sqlx/) and without downloads
# beyond crates.io (Swagger UI is vendored by utoipa-swagger-ui's `vendored` feature).
# Needs BuildKit, for the cache mounts that keep the cargo registry and the build between builds: the default of
# `docker build` since Docker 23 and of `docker compose`; with docker-compose v1 or an older engine, set
# DOCKER_BUILDKIT=1 (and a `docker` CLI that has BuildKit: buildx, or the CLI of Docker 20.10 to 22).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
ENV SQLX_OFFLINE=true
COPY Cargo.toml Cargo.lock clippy.toml ./
COPY .cargo .cargo
COPY .sqlx .sqlx
COPY migrations migrations
COPY crates crates
# A member of the workspace: cargo reads every member's manifest, even to build only the two binaries.
COPY bench/sse-client bench/sse-client
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin api --bin worker \
    && install -D -m 0755 -t /rootfs/usr/local/bin target/release/api target/release/worker

# The runtime image's whole file system, gathered here: the two binaries; the shared libraries they load and
# nothing else (glibc's and libgcc's: TLS is rustls, the allocator mimalloc, both compiled in), copied from this
# image so they are the very ones the binaries were linked against; CA certificates (a rediss:// Redis or
# sslmode=verify-full checks its server against them); and the unprivileged user.
RUN set -eu; \
    for lib in $(ldd /rootfs/usr/local/bin/api /rootfs/usr/local/bin/worker \
                 | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $2 ~ /^\(/ { print $1 }' | sort -u); do \
        cp --parents --dereference "$lib" /rootfs; \
    done; \
    install -D -m 0644 /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ca-certificates.crt; \
    printf 'root:x:0:0:root:/root:/sbin/nologin\norders:x:10001:10001:orders:/nonexistent:/sbin/nologin\n' \
        >/rootfs/etc/passwd; \
    printf 'root:x:0:\norders:x:10001:\n' >/rootfs/etc/group; \
    printf 'hosts: files dns\n' >/rootfs/etc/nsswitch.conf; \
    install -d -m 1777 /rootfs/tmp

# No shell, package manager or other tool: `api healthcheck` serves as the healthcheck (see docker-compose.yml).
FROM scratch AS runtime
COPY --from=build /rootfs /
# Nothing in the container runs as root.
USER orders:orders
ENV PATH=/usr/local/bin \
    BIND_ADDR=0.0.0.0:8000 \
    LOG_FORMAT=json \
    RUST_LOG=info
EXPOSE 8000
STOPSIGNAL SIGTERM
CMD ["api"]
