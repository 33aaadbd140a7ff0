# syntax=docker/dockerfile:1
# stowage: one image for `stowage serve` (node proxy, cluster cache) and `stowage operator`.
#   docker build -t stowage .
#   docker run -p 7439:7439 -v stowage:/var/lib/stowage stowage

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir "uv==${UV_VERSION}"
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
# Dependencies first (cached while only the source changes), then the project itself,
# installed as a wheel (not editable) so that the venv does not need /src.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-editable --no-install-project
COPY README.md ./
COPY src ./src
RUN uv sync --frozen --no-dev --no-editable

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 65532 stowage \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin stowage \
 && install -d -o 65532 -g 65532 -m 0750 /var/lib/stowage
COPY --from=builder /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STOWAGE_DATA=/var/lib/stowage
USER 65532:65532
WORKDIR /var/lib/stowage
VOLUME /var/lib/stowage
EXPOSE 7439
ENTRYPOINT ["stowage"]
CMD ["serve", "--listen", "0.0.0.0:7439"]
