# The one channelmesh binary; every service in docker-compose.yml is a subcommand of it. Only
# the product: the load generator (bench/loadgen, `channelmesh bench`) is not built into it.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p channelmesh --bin channelmesh

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 channelmesh
# The certificates' volume in docker-compose.yml: a named volume takes this folder's owner.
RUN mkdir /certs && chown channelmesh /certs
COPY --from=build /src/target/release/channelmesh /usr/local/bin/channelmesh
USER channelmesh
ENTRYPOINT ["channelmesh"]
