# asm: node agent and controller in one image, with the agent CLIs the node runs.
#
#   docker build -t asm:0.1.0 .
#   docker run --rm asm:0.1.0 --version
#   docker run -d -e ASM_TOKEN=... -p 7070:7070 -p 9470:9470 asm:0.1.0 \
#       node serve --listen 0.0.0.0:7070 --workspace-root /home/asm/workspaces --metrics-listen 0.0.0.0:9470 --metrics-insecure
#
# python:3.11-slim on Debian trixie: its nodejs (20.x) satisfies every pinned CLI (the Gemini CLI
# needs Node >= 20; bookworm's nodejs is 18).
FROM python:3.11-slim-trixie

# Pinned like scripts/install_clis.sh (tests/test_deploy.py checks they agree).
ARG CLAUDE_CODE_VERSION=2.1.197
ARG CODEX_VERSION=0.169.0
ARG GEMINI_CLI_VERSION=0.61.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NPM_CONFIG_UPDATE_NOTIFIER=false \
    NPM_CONFIG_FUND=false \
    NPM_CONFIG_AUDIT=false \
    DISABLE_AUTOUPDATER=1 \
    TINI_SUBREAPER=1

# Node.js + npm for the agent CLIs, tini as PID 1 (reaps orphaned CLI children and forwards
# signals), git and CA certificates for the CLIs themselves.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs npm tini git ca-certificates \
 && npm install -g --no-audit --no-fund \
      "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}" \
      "@openai/codex@${CODEX_VERSION}" \
      "@google/gemini-cli@${GEMINI_CLI_VERSION}" \
 && npm cache clean --force \
 && rm -rf /var/lib/apt/lists/* /root/.npm \
 && claude --version && codex --version && gemini --version

# The non-root user everything runs as (uid/gid 10001, matching deploy/k8s runAsUser).
RUN groupadd --system --gid 10001 asm \
 && useradd --system --uid 10001 --gid asm --create-home --home-dir /home/asm --shell /usr/sbin/nologin asm \
 && install -d -o asm -g asm -m 0750 /home/asm/workspaces

COPY . /src
RUN pip install /src && rm -rf /src && asm --version

# The asm user, numerically, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/asm
ENV HOME=/home/asm

# node: gRPC 7070, metrics 9470; controller: gRPC 7080, metrics 9480.
EXPOSE 7070 9470 7080 9480

# tini is PID 1 (with TINI_SUBREAPER it also works under `docker run --init` / compose `init: true`).
ENTRYPOINT ["tini", "--", "asm"]
CMD ["--help"]
