"""``finetune serve``: an OpenAI-compatible HTTP server over a run folder or a Hugging Face folder.

``engine`` batches requests continuously over per-row KV-cache slots (a ``Scheduler`` that decides who runs, a
``Runner`` that runs the model); ``api`` is the FastAPI front end (validation, errors, streaming, metrics);
``server`` loads the model and runs uvicorn.
"""
