# syntax=docker/dockerfile:1
# One image for both binaries: `api` (the default command) and `worker`.
# Builds without a database (compile-checked queries come from the committed .sqlx/) and without downloads
# beyond crates.io (Swagger UI is vendored by utoipa-swagger-ui's `vendored` feature).

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
ENV SQLX_OFFLINE=true
COPY Cargo.toml Cargo.lock clippy.toml ./
COPY .cargo .cargo
COPY .sqlx .sqlx
COPY migrations migrations
COPY crates crates
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin api --bin worker \
    && install -m 0755 target/release/api target/release/worker /usr/local/bin/

FROM debian:bookworm-slim AS runtime
# A fixed, unprivileged user: nothing in the container runs as root.
RUN groupadd --system --gid 10001 orders \
    && useradd --system --uid 10001 --gid orders --no-create-home --shell /usr/sbin/nologin orders
COPY --from=build /usr/local/bin/api /usr/local/bin/worker /usr/local/bin/
USER orders:orders
ENV BIND_ADDR=0.0.0.0:8000 \
    LOG_FORMAT=json \
    RUST_LOG=info
EXPOSE 8000
STOPSIGNAL SIGTERM
CMD ["api"]
