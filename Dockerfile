# The hpo image: the `worker` and `dashboard` services of docker-compose.yml run it.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY hpo ./hpo
COPY studies ./studies
# torch from PyPI is the CUDA build; the worker's GPU comes from the compose reservation.
RUN pip install --no-cache-dir .
ENTRYPOINT []
CMD ["hpo", "--help"]
