"""What benchmark results files may hold."""

from sgl_kvext_bench.report import redacted


def test_results_never_record_secret_flag_values() -> None:
    flags = ["--api-key", "sk-1", "--max-total-tokens", "64", "--admin-api-key=adm",
             "--kvext-s3-secret", "s", "--dtype", "float32", "--api-key"]
    assert redacted(flags) == ["--api-key", "***", "--max-total-tokens", "64",
                               "--admin-api-key=***", "--kvext-s3-secret", "***", "--dtype",
                               "float32", "--api-key"]
