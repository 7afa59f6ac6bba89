//! The ServiceMesh adapter over RabbitMQ. Implementation pending.
