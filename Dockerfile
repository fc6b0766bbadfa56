# Builds the jobq binaries; docker-compose.yml runs each with a different command.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p jobq-cli -p jobq-api -p jobq-worker -p jobq-scheduler

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/jobq /src/target/release/jobq-api /src/target/release/jobq-worker /src/target/release/jobq-scheduler /usr/local/bin/
ENV JOBQ_LOG_FORMAT=json
CMD ["jobq-api"]
