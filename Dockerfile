# The platform image: every servefleet service and a Ray runtime for the head and workers.
FROM python:3.11-slim-bookworm
# gRPC C++ and protoc: the C++ direct ingress (setup.py) is compiled by pip install.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential pkg-config \
    libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/servefleet
COPY . .
RUN pip install --no-cache-dir . && useradd --create-home servefleet
USER servefleet
EXPOSE 7404 7405 7406 7407
CMD ["servefleet", "--help"]
