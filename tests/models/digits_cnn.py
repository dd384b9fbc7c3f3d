"""A small convolutional model of scikit-learn's 8×8 digits, for `skyfuse train --model`.

skyfuse feeds rows of raw features (here 64 pixel intensities, 0..16); the model scales them and
reshapes them to 8×8×1 images itself, and ends with a softmax over the 10 classes.

    skyfuse train digits.csv --target digit --model tests/models/digits_cnn.py:build
"""
import keras


def build() -> keras.Model:
    model = keras.Sequential([
        keras.Input(shape=(64,)),
        keras.layers.Rescaling(1 / 16),
        keras.layers.Reshape((8, 8, 1)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(10, activation="softmax"),
    ], name="digits_cnn")
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
