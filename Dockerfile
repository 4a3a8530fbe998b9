# The app on CPU: docker build -t which-images . && docker run -p 8501:8501 -v which-images:/data which-images
# The first start trains the `cpu` model (about a minute) and precomputes the galleries in the
# background; both, and every result, are kept on the /data volume across restarts.
FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt .
# CPU-only torch wheels, then the rest of the pinned requirements.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 \
 && pip install --no-cache-dir -r requirements.txt
COPY . .
ENV APP_RUN=/data/runs/cpu APP_CACHE=/data/cache APP_PRESET=cpu
VOLUME /data
EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4).read() != b'ok')"
CMD ["python", "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.address", "0.0.0.0", \
     "--server.port", "8501", "--browser.gatherUsageStats", "false"]
