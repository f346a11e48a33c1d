
pipe-1client-1"server.echo2hello