# One image for every part of a tether deployment: `tether serve` (the root),
# `tether relay`, and `tether work` (native workers). The build stage compiles the
# release binary; the runtime stage holds it, the Fashion-MNIST the default run
# trains on, and the two libraries the binary loads at run time.
#
#   docker build -t tether .
#   docker run --rm -p 8080:8080 -v tether-runs:/var/lib/tether tether serve
#   docker run --rm tether relay --upstream ws://root:8080 --port 8080
#   docker run --rm --gpus all tether work --server ws://root:8080
#
# The container runs as an unprivileged user (uid 10001) in /var/lib/tether, where
# `tether serve` keeps its runs (mount a volume there to keep checkpoints).

FROM docker.io/library/rust:1.95-slim-bookworm AS build
WORKDIR /src
# gcc for ring's assembly (TLS); nothing else is built from C.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked -p tether \
 && cp target/release/tether /tether

FROM docker.io/library/debian:bookworm-slim
# libvulkan1: the Vulkan loader wgpu opens for a GPU (the driver's ICD comes from
# the host, e.g. the NVIDIA container toolkit); ca-certificates: the system roots
# a worker trusts for wss:// besides its built-in ones.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvulkan1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/tether --create-home tether
COPY --from=build /tether /usr/local/bin/tether
COPY data/fashion-mnist /usr/local/share/tether/fashion-mnist
ENV TETHER_DATA=/usr/local/share/tether/fashion-mnist \
    TETHER_CACHE=/var/lib/tether/cache
USER 10001:10001
WORKDIR /var/lib/tether
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/tether"]
CMD ["serve"]
