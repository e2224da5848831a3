# The examples of the original design document, run as written, one after
# the other, in one driver; each prints its results on a line of its own.
from distripool import Pool, make_orchestrator


def square(x):
    return x * x


def calculate_twos_logarithm(x):
    import math

    return math.log(x, 2)


def add(x, y):
    return x + y


if __name__ == "__main__":
    # somewhere before the first usage of Pool:
    make_orchestrator()

    # some other code ...

    data = [i for i in range(20)]

    with Pool() as pool:
        results = pool.map(square, data)

    print(results)

    with Pool() as pool:
        results = pool.map(calculate_twos_logarithm, [1, 2, 3])

    print(results)

    with Pool() as pool:
        # does not block
        async_results = pool.map_async(square, data)

        # execute other code here ...

        # get blocks until results are ready
        results = async_results.get()

    print(results)

    data = [(i, i + 1) for i in range(20)]

    with Pool() as pool:
        results = pool.starmap(add, data)

    print(results)
