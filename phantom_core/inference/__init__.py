"""Generation without ComfyUI: the settings that determine a video (``settings``), loading the three models and
sampling one video to an MP4 (``pipeline``), the JSON sidecar beside it (``sidecar``) and the ``generate`` /
``inspect`` commands (``cli``)."""
