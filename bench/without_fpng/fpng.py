"""Put on PYTHONPATH by bench/serving.py to run the service as it runs without fpng (Pillow's PNG encoder)."""

raise ImportError("fpng hidden by bench/without_fpng to measure the Pillow fallback")
