"""The web demo: ``python -m entityseg.app ckpt_path=...`` (needs ``pip install -e '.[app]'``).

:mod:`~entityseg.app.service` segments an upload and writes its downloads (no web code);
:mod:`~entityseg.app.page` is the Gradio page; ``__main__`` reads ``conf/app.yaml`` and serves it.
"""
