# One image for the API + runner, the Ray head and workers, and the dashboard (see docker-compose.yml).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

RUN useradd --create-home --uid 10001 budgetpress \
    && mkdir -p /var/lib/budgetpress/artifacts /var/lib/budgetpress/levels /var/lib/budgetpress/exports /models \
    && chown -R budgetpress:budgetpress /var/lib/budgetpress

WORKDIR /opt/budgetpress
COPY pyproject.toml README.md ./
COPY budgetpress ./budgetpress
COPY space ./space
COPY kernels ./kernels
COPY evaluators ./evaluators
COPY search ./search
COPY workers ./workers
COPY api ./api
COPY dashboard ./dashboard
RUN pip install .

USER budgetpress
WORKDIR /home/budgetpress
EXPOSE 8000
CMD ["budgetpress", "serve", "--host", "0.0.0.0", "--port", "8000"]
