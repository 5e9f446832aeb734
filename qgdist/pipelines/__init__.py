"""End-to-end pipelines above the stages: the quickstart, and the toy datasets benches and tests share."""
