"""What a person or another program meets: the ``bucketchat`` command, the chat REPL and the HTTP
server with its page. The only layer that applies the environment and starts Prefect's API."""
