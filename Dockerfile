# One image for every tlbsim service and the load generator:
#   docker build -t tlbsim .
#   docker run tlbsim serve coordinator          (ENTRYPOINT is `tlbsim`)
#   docker run tlbsim load run munmap --cluster coordinator:50051
# docker-compose.yml and deploy/k8s/ use it. tests/deploy/ checks this file statically
# and runs its HEALTHCHECK command against a live service.

# --- builder: the pinned dependencies of pyproject.toml, the generated gRPC code, tlbsim
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Dependencies first (their own layer, rebuilt only when pyproject.toml changes): exactly
# [project] dependencies, every one pinned with ==, nothing else.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && pip install --prefix=/install --requirement requirements.txt
COPY proto/ proto/
COPY tools/gen_proto.py tools/
COPY services/ services/
COPY loadgen/ loadgen/
# gen/tlbsim must exist before the install (pyproject.toml maps the tlbsim package to it).
RUN PYTHONPATH=/install/lib/python3.11/site-packages python tools/gen_proto.py \
 && pip install --prefix=/install --no-deps .

# --- runtime: the installed packages only, as a non-root user
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    TLBSIM_LISTEN=0.0.0.0:50051 TLBSIM_METRICS_PORT=9100
COPY --from=builder /install /usr/local
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent tlbsim
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9100
# gRPC health checking (grpc.health.v1) on the service's own port; SERVING or unhealthy.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=5 \
    CMD ["python", "-m", "services.common.healthcheck", "--addr", "127.0.0.1:50051"]
# Exec form: tlbsim is PID 1 and gets SIGTERM itself (it stops gracefully within 2 s).
ENTRYPOINT ["tlbsim"]
CMD ["--help"]
