"""The notebook kit: papermill runs and reports (repro, report), results and claims, the course build, figures."""
