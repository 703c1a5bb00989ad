# The one channelmesh binary; every service in docker-compose.yml is a subcommand of it. Only
# the product: the load generator (bench/loadgen, `channelmesh bench`) is not built into it.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p channelmesh --bin channelmesh

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 channelmesh
COPY --from=build /src/target/release/channelmesh /usr/local/bin/channelmesh
USER channelmesh
ENTRYPOINT ["channelmesh"]
