"""The fragment path: a prompt's chunks (``chunking``, marked or content-defined), which of them
have stored KV (``index``), that KV in the tier chain (``store``), the blend that reuses it and
the registration that fills it (``blender``), what each blend did (``report``), and pre-warming
a corpus from a client (``prewarm_client``). The blended prefill itself is
:mod:`sgl_kvext.blend`."""
