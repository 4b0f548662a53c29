# Citadel: multi-stage, non-root, read-only-root-filesystem friendly.
#   docker build -t citadel:2.1.0 .
#   docker run --read-only --tmpfs /tmp -v citadel-data:/var/lib/citadel --env-file .env -p 8004:8004 citadel:2.1.0
# HTTPS: mount the certificate and key and name them, e.g.
#   -v "$PWD/tls:/etc/citadel/tls:ro" -e CITADEL_TLS_CERT_FILE=/etc/citadel/tls/tls.crt \
#   -e CITADEL_TLS_KEY_FILE=/etc/citadel/tls/tls.key   (README: "TLS and mutual TLS")
# No "# syntax=" line: it makes BuildKit fetch a frontend image from a registry
# before building, which fails where only the base image is available; the
# built-in frontend understands everything used here.
# scripts/check-container builds this image and checks it as an operator runs it.

FROM python:3.11-slim AS build
WORKDIR /src
COPY docker/install docker/install
COPY pyproject.toml ./
# The client distribution (errors and client code the server shares): installed
# from the tree, never looked up by name on a public index.
COPY client ./client
# Dependencies only: this layer is rebuilt only when pyproject.toml or client/ change.
RUN docker/install deps /opt/venv
COPY README.md ./
COPY citadel ./citadel
RUN docker/install app /opt/venv
# Nothing is installed at run time: no pip in the runtime image (15 MB less, and
# one tool fewer for an intruder).
RUN /opt/venv/bin/python -m pip uninstall --quiet --yes pip

FROM python:3.11-slim
# uid and gid 10001, both with an entry (so `id` and logs name them), made
# explicitly: `useradd --user-group` would pick the next free system gid (999),
# not 10001. No home is created: --create-home copies /etc/skel's dotfiles into
# what becomes the data volume. The directory is Citadel's alone (0700); a new
# named volume mounted there copies this owner and mode.
RUN groupadd --system --gid 10001 citadel \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/citadel --shell /usr/sbin/nologin citadel \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/citadel
COPY --from=build /opt/venv /opt/venv
# The keyring and, in development, the generated keys live on the data volume;
# nothing else is written, so the root filesystem can be read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CITADEL_LOCAL_KEYRING=/var/lib/citadel/keyring.json
WORKDIR /var/lib/citadel
VOLUME ["/var/lib/citadel"]
USER 10001:10001
EXPOSE 8004
# GET /health on 127.0.0.1, over HTTPS when CITADEL_TLS_CERT_FILE is set (with
# the client certificate of CITADEL_CLIENT_CERT_FILE/_KEY_FILE under mutual TLS).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-m", "citadel.healthcheck", "8004", "/health"]
STOPSIGNAL SIGTERM
CMD ["citadel", "serve", "--host", "0.0.0.0", "--port", "8004"]
