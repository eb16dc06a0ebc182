"""Job glue: one function per workflow rule (file paths and typed settings in, files out), the
logging and error handling every script runs under (scripting), and the run manifest."""
