"""Running the real thing on one machine: an SGLang server (``server``), a SeaweedFS S3 server
(``seaweedfs``), the embedded model (``model_prep``), the demo and the ``sgl-kvext`` command.
Used by the demo, the tests and the benchmarks; never imports sglang."""
