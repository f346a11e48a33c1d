
pipe-2client-2"parse.tokens store.save*key-422a b c