# syntax=docker/dockerfile:1
# One image for every nodemesh binary: mesh-agent (+ nodemesh-cni), mesh-controller and meshctl.
#   docker build -t ghcr.io/nodemesh/nodemesh:0.1.0 .
# See docs/install.md for building without Docker and loading the image into a cluster.

# --- build: stable Rust for the workspace, Debian's rustc-web (precompiled `core` for bpfel) and bpf-linker
# (LLVM 22) for the eBPF object the agent embeds.
FROM rust:1.87-bookworm AS build
RUN echo "deb http://deb.debian.org/debian-security bookworm-security main" > /etc/apt/sources.list.d/security.list \
    && apt-get update \
    && apt-get install -y --no-install-recommends rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
RUN LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --no-default-features --features llvm-22
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin mesh-agent --bin nodemesh-cni --bin mesh-controller --bin meshctl \
    && mkdir -p /out \
    && cp target/release/mesh-agent target/release/nodemesh-cni target/release/mesh-controller target/release/meshctl /out/

# --- runtime: the agent shells out to `ip` for the pod-local policy routing rule; nothing else is needed.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# `mesh-agent cni install` copies nodemesh-cni from next to mesh-agent onto the node.
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
ENTRYPOINT []
CMD ["mesh-agent", "--help"]
