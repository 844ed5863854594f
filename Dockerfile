# The Pilothouse operator image (also the gateway image: `pilothouse serve` lands with the data plane).
#
#   docker build -t pilothouse:dev .
#   docker run --rm pilothouse:dev --help
#
# A plain, non-editable `pip install .`: pyproject's package-dir maps operator/ -> pilothouse.operator
# and serving/ -> pilothouse.serving, so the installed wheel is self-contained and /src is dropped.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . .
RUN pip install --no-cache-dir . \
 && cd / \
 && rm -rf /src

# The chart runs it with a read-only root filesystem and an emptyDir on /tmp.
WORKDIR /tmp
# Numeric, so runAsNonRoot can verify it without an /etc/passwd entry.
USER 10001

ENTRYPOINT ["pilothouse"]
CMD ["operator"]
