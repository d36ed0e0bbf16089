# The platform image: every servefleet service and a Ray runtime for the head and workers.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/servefleet
COPY . .
RUN pip install --no-cache-dir . && useradd --create-home servefleet
USER servefleet
EXPOSE 7404 7405 7406 7407
CMD ["servefleet", "--help"]
