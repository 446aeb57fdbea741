"""Code shared by uwsgi-app and flask-app: build checks, health reporting and the readiness probe."""
