"""`srvit bench`: measures a server over HTTP (load, accuracy) and runs the benchmark matrix; not the product."""
