# One image for Tianshu's services; each compose service picks its command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY libs libs
COPY contracts contracts
COPY services services
COPY examples examples
COPY deploy deploy
RUN pip install --no-cache-dir .
ENV PYTHONUNBUFFERED=1
CMD ["tianshu-scheduler"]
