"""dcache's Gradio demo (``dcache demo`` or ``python demos/app.py``): baseline vs accelerated.

The folder ``demos/`` is installed as the package ``dcache.demos``; the UI is in :mod:`.app`,
the work of each tab in :mod:`.image_task`, :mod:`.dllm_task` and :mod:`.video_task`.
"""
