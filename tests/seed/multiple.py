from distripool import Pool, make_orchestrator

orchestrator = make_orchestrator(("127.0.0.1:1337", "127.0.0.1:1338"))

with Pool(orchestrator=orchestrator) as pool:
    # perform tasks with your custom orchestrator
    pass

# close it once you're done with it in order to free the ports defined above.
orchestrator.close()

# Beyond the example: the ports are free again, and a pool on them works.
again = make_orchestrator(("127.0.0.1:1337", "127.0.0.1:1338"))
with Pool(orchestrator=again) as pool:
    print(pool.map(abs, [-1, -2, 3]))
again.close()
print("closed")
