"""The Airflow face: what the DAG files call (`tasks`), the connections and Params they need
and the errors turned into Airflow's (`glue`), and the cutover task with its approval
(`approval`). No other part of the library imports this package."""
