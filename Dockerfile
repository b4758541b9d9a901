# One image for Tianshu's services; each compose service picks its command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY libs libs
COPY contracts contracts
COPY services services
COPY examples examples
COPY deploy deploy
# The versions of uv.lock, no others: uv (the version the lock names) installs the project and its
# runtime dependencies into /app/.venv with the image's Python, then leaves.
ENV UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1 UV_NO_CACHE=1
RUN pip install --no-cache-dir "uv==$(sed -n '/^name = "uv"$/{n;s/^version = "\(.*\)"$/\1/p;}' uv.lock)" \
    && uv sync --locked --no-editable \
    && pip uninstall --yes uv
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1
CMD ["tianshu-scheduler"]
