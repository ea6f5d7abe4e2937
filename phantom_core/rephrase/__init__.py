"""The rephraser (paper: multi-subject success 65% -> 95%): a vision-language model rewrites the prompt to describe
each reference. ``rephraser`` (instructions, prompt building, answer checks), ``types`` (errors, result, the
``ChatBackend`` interface), ``cache``, ``backends`` (``make_backend``), ``endpoint`` (OpenAI-compatible server),
``local`` (a transformers model folder), ``cli`` (the ``rephrase`` command and the ``--rephrase-*`` options).
Its public names are in the ``phantom_core`` facade."""
