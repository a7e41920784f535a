"""srvit serving: reads model_repo/ and serves it over HTTP; never imports torch or srvit."""
