"""The demo and what the tests and the benchmark start: throwaway PostgreSQL servers and S3
endpoints (`embedded`), a seeded dataset, an application's writer, a real Airflow. Its
dependencies come with the `demo` extra (`pip install residency-migrator[demo]`), which a
deployment leaves out."""
