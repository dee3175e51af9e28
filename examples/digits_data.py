"""The digits data set split used by the example model and the tests (seeded)."""
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def split():
    """((x_train, y_train), (x_test, y_test)); x rows are 64 pixels in 0..16."""
    d = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        d.data, d.target, test_size=0.25, random_state=0, stratify=d.target)
    return (x_train, y_train), (x_test, y_test)
