# TensorFlow Serving with the image_classifier SavedModel baked in.
#
# Documented flow (from the repository root, once a model has been exported to
# saved_models/image_classifier/<integer version>/):
#
#   docker build -t image_classifier_server .
#   docker run -p 8501:8501 --name=tf_serving image_classifier_server
#   curl http://localhost:8501/v1/models/image_classifier     # -> "state": "AVAILABLE"
#
# Add -p 8500:8500 for gRPC. The stock entrypoint runs
#   tensorflow_model_server --port=8500 --rest_api_port=8501 \
#     --model_name=${MODEL_NAME} --model_base_path=${MODEL_BASE_PATH}/${MODEL_NAME} "$@"
# so the default behaviour is unchanged here, and any extra arguments pass straight through.
# The monitoring and batching configs copied below are opt-in through those arguments:
#
#   docker run -p 8501:8501 image_classifier_server \
#     --monitoring_config_file=/etc/tf_serving/monitoring.config \
#     --enable_batching=true --batching_parameters_file=/etc/tf_serving/batching.config \
#     --enable_model_warmup=true
#
# Each exported version carries assets.extra/tf_serving_warmup_requests (one request per
# signature), which TF Serving replays before the version becomes AVAILABLE.
#
# compose.yaml does exactly that (`docker compose up --build` starts this and the gateway).
#
# Pinned to an exact release so a rebuild serves the model with the same server. The model is
# trained and exported with TensorFlow 2.21 (pyproject [train]); it uses only stock ops, and
# tf.saved_model.save strips default-valued attributes, so an older model server loads it. Bump
# the tag to the matching 2.21.x image once it is published. The official image is linux/amd64.
FROM tensorflow/serving:2.19.0

# Configs first: they change less often than the model, so this layer stays cached.
COPY docker/tf_serving/ /etc/tf_serving/
# Every integer version directory is copied; the server serves the highest one and keeps polling
# the base path, so a newer version mounted or copied in later loads without a restart.
COPY saved_models/image_classifier /models/image_classifier

ENV MODEL_BASE_PATH=/models \
    MODEL_NAME=image_classifier

# 8500: gRPC (PredictionService), 8501: REST (/v1/models/image_classifier[:predict]).
EXPOSE 8500 8501
