# Self-hosted PgBouncer (>= 1.21) on ECS Fargate behind an internal Network Load Balancer.
#
# Transaction pooling, SCRAM-SHA-256, named prepared statements (max_prepared_statements), TLS from
# clients to PgBouncer and from PgBouncer to PostgreSQL, credentials from Secrets Manager, CPU
# autoscaling and health checks on both the load balancer and the container.
#
# The tuning is the repository's asyncpool/testing/pgbouncer.ini (the file the test harness and
# compose.yaml run), rendered at start by deploy/pgbouncer/entrypoint.sh, the same script compose
# runs. Only the server pool is changed here: it is divided between the tasks so that autoscaling
# never opens more than server_pool_total connections to PostgreSQL.

data "aws_region" "current" {}
data "aws_caller_identity" "current" {}

locals {
  region = data.aws_region.current.region

  settings_path = coalesce(var.settings_file, "${path.module}/../../../asyncpool/testing/pgbouncer.ini")
  settings_text = file(local.settings_path)
  # "key = value" lines of the ini file (comments and the [pgbouncer] header skipped).
  shared_settings = {
    for line in split("\n", local.settings_text) :
    trimspace(split("=", line)[0]) => trimspace(join("=", slice(split("=", line), 1, length(split("=", line)))))
    if length(regexall("^[a-z_]+[[:space:]]*=", line)) > 0
  }

  per_task_pool = floor(var.server_pool_total / var.max_tasks)
  overrides = merge(var.settings_overrides, {
    default_pool_size  = tostring(local.per_task_pool)
    max_db_connections = tostring(local.per_task_pool)
  })
  max_client_conn = tonumber(lookup(var.settings_overrides, "max_client_conn", local.shared_settings["max_client_conn"]))

  entrypoint_script = file("${path.module}/../../../deploy/pgbouncer/entrypoint.sh")
  container_name    = "pgbouncer"
  endpoint          = var.dns_name != null ? var.dns_name : aws_lb.this.dns_name

  secrets = concat(
    [
      { name = "APP_DB_PASSWORD", valueFrom = "${var.db_credentials_secret_arn}:password::" },
      { name = "PGBOUNCER_TLS_CERT", valueFrom = "${var.tls_secret_arn}:certificate::" },
      { name = "PGBOUNCER_TLS_KEY", valueFrom = "${var.tls_secret_arn}:private_key::" },
    ],
    var.stats_credentials_secret_arn == null ? [] : [
      { name = "PGBOUNCER_STATS_PASSWORD", valueFrom = "${var.stats_credentials_secret_arn}:password::" },
    ],
  )
  secret_arns = compact([var.db_credentials_secret_arn, var.tls_secret_arn, var.stats_credentials_secret_arn])

  environment = [
    { name = "PGBOUNCER_SETTINGS", value = local.settings_text },
    { name = "PGBOUNCER_OVERRIDES", value = join("\n", [for k, v in local.overrides : "${k} = ${v}"]) },
    { name = "PGBOUNCER_CONF_DIR", value = "/tmp/pgbouncer" },
    { name = "PGBOUNCER_LISTEN_ADDR", value = "0.0.0.0" },
    { name = "PGBOUNCER_LISTEN_PORT", value = tostring(var.listen_port) },
    { name = "PGBOUNCER_CLIENT_TLS_SSLMODE", value = "require" },
    { name = "PGBOUNCER_SERVER_TLS_SSLMODE", value = var.server_tls_sslmode },
    { name = "DB_HOST", value = var.db_host },
    { name = "DB_PORT", value = tostring(var.db_port) },
    { name = "APP_DB_USER", value = var.db_username },
    { name = "PGBOUNCER_SERVER_TLS_CA", value = var.server_tls_ca_pem },
    # A read-only console user (SHOW only); the entrypoint configures no admin user.
    { name = "PGBOUNCER_STATS_USER", value = "pgb_stats" },
  ]
}

# -- logs ---------------------------------------------------------------------------------------

resource "aws_cloudwatch_log_group" "this" {
  name              = "/ecs/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
  tags              = var.tags
}

# -- IAM: the execution role pulls the image, writes logs and reads the secrets at task start ---

data "aws_iam_policy_document" "tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

resource "aws_iam_role" "execution" {
  name_prefix        = "${var.name}-exec-"
  description        = "PgBouncer ${var.name}: pull the image, write logs, read secrets at task start."
  assume_role_policy = data.aws_iam_policy_document.tasks_assume.json
  tags               = var.tags
}

data "aws_iam_policy_document" "execution" {
  statement {
    sid       = "WriteLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.this.arn}:*"]
  }

  statement {
    sid       = "ReadSecrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = local.secret_arns
  }

  statement {
    sid       = "DecryptSecrets"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["secretsmanager.${local.region}.amazonaws.com"]
    }
  }

  dynamic "statement" {
    for_each = var.ecr_repository_arn == null ? [] : [var.ecr_repository_arn]
    content {
      sid       = "PullImage"
      actions   = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]
      resources = [statement.value]
    }
  }

  dynamic "statement" {
    for_each = var.ecr_repository_arn == null ? [] : [var.ecr_repository_arn]
    content {
      sid       = "EcrLogin"
      actions   = ["ecr:GetAuthorizationToken"]
      resources = ["*"] # GetAuthorizationToken has no resource-level permissions
    }
  }
}

resource "aws_iam_role_policy" "execution" {
  name   = "pgbouncer-start"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution.json
}

# The task itself calls no AWS API: its role has no policy at all.
resource "aws_iam_role" "task" {
  name_prefix        = "${var.name}-task-"
  description        = "PgBouncer ${var.name} tasks: no AWS permissions."
  assume_role_policy = data.aws_iam_policy_document.tasks_assume.json
  tags               = var.tags
}

# -- network: clients -> load balancer -> tasks -> database -------------------------------------

resource "aws_security_group" "lb" {
  name_prefix = "${var.name}-lb-"
  description = "PgBouncer ${var.name} load balancer: PostgreSQL protocol from clients to the tasks."
  vpc_id      = var.vpc_id
  tags        = var.tags

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "lb_from_clients" {
  for_each = toset(var.client_security_group_ids)

  security_group_id            = aws_security_group.lb.id
  description                  = "PgBouncer from asyncpool clients"
  ip_protocol                  = "tcp"
  from_port                    = var.listen_port
  to_port                      = var.listen_port
  referenced_security_group_id = each.value
  tags                         = var.tags
}

resource "aws_vpc_security_group_egress_rule" "lb_to_tasks" {
  security_group_id            = aws_security_group.lb.id
  description                  = "PgBouncer tasks (traffic and health checks)"
  ip_protocol                  = "tcp"
  from_port                    = var.listen_port
  to_port                      = var.listen_port
  referenced_security_group_id = aws_security_group.tasks.id
  tags                         = var.tags
}

resource "aws_security_group" "tasks" {
  name_prefix = "${var.name}-tasks-"
  description = "PgBouncer ${var.name} tasks: from the load balancer, to PostgreSQL and AWS APIs."
  vpc_id      = var.vpc_id
  tags        = var.tags

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "tasks_from_lb" {
  security_group_id            = aws_security_group.tasks.id
  description                  = "PgBouncer from the load balancer"
  ip_protocol                  = "tcp"
  from_port                    = var.listen_port
  to_port                      = var.listen_port
  referenced_security_group_id = aws_security_group.lb.id
  tags                         = var.tags
}

resource "aws_vpc_security_group_egress_rule" "tasks_to_db" {
  security_group_id            = aws_security_group.tasks.id
  description                  = "PostgreSQL"
  ip_protocol                  = "tcp"
  from_port                    = var.db_port
  to_port                      = var.db_port
  referenced_security_group_id = var.db_security_group_id
  tags                         = var.tags
}

resource "aws_vpc_security_group_egress_rule" "tasks_to_aws_apis" {
  security_group_id = aws_security_group.tasks.id
  description       = "HTTPS to Secrets Manager, CloudWatch Logs and the image registry (through NAT or VPC endpoints)"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
  tags              = var.tags
}

resource "aws_vpc_security_group_ingress_rule" "db_from_tasks" {
  security_group_id            = var.db_security_group_id
  description                  = "PostgreSQL from PgBouncer ${var.name}"
  ip_protocol                  = "tcp"
  from_port                    = var.db_port
  to_port                      = var.db_port
  referenced_security_group_id = aws_security_group.tasks.id
  tags                         = var.tags
}

# -- internal Network Load Balancer --------------------------------------------------------------

resource "aws_lb" "this" {
  #checkov:skip=CKV_AWS_91:NLB access logs are written for TLS listeners only; PostgreSQL negotiates TLS inside its own protocol (SSLRequest), so the listener is TCP and PgBouncer terminates TLS and logs connections itself
  name                             = "${var.name}-pgb"
  internal                         = true
  load_balancer_type               = "network"
  subnets                          = var.subnet_ids
  security_groups                  = [aws_security_group.lb.id]
  enable_cross_zone_load_balancing = true
  enable_deletion_protection       = var.deletion_protection
  tags                             = var.tags
}

resource "aws_lb_target_group" "this" {
  name_prefix = "pgb-"
  port        = var.listen_port
  protocol    = "TCP"
  target_type = "ip"
  vpc_id      = var.vpc_id
  # A stopping task keeps its clients this long, then the NLB closes their connections; asyncpool
  # replaces a closed connection on its next checkout.
  deregistration_delay   = 60
  connection_termination = true

  # A cancel request (query timeout, leak reclaim) arrives on a new TCP connection and must reach
  # the task whose PgBouncer holds the query; any other task drops it. Fargate task addresses
  # change with every deployment and scaling step, so PgBouncer peering (peer_id + [peers], fixed
  # addresses) does not fit here: the NLB sends every connection from one client address to the
  # same task instead. Each task runs one PgBouncer process (no so_reuseport inside a task).
  stickiness {
    enabled = true
    type    = "source_ip"
  }

  health_check {
    protocol            = "TCP"
    port                = "traffic-port"
    interval            = 10
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  tags = var.tags

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_lb_listener" "this" {
  # TCP, not TLS: PostgreSQL starts in clear text and upgrades to TLS in-band (SSLRequest), which
  # an NLB TLS listener would break. PgBouncer terminates TLS itself (client_tls_sslmode = require).
  load_balancer_arn = aws_lb.this.arn
  port              = var.listen_port
  protocol          = "TCP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.this.arn
  }

  tags = var.tags
}

resource "aws_route53_record" "this" {
  count = var.dns_name != null && var.route53_zone_id != null ? 1 : 0

  zone_id = var.route53_zone_id
  name    = var.dns_name
  type    = "A"

  alias {
    name                   = aws_lb.this.dns_name
    zone_id                = aws_lb.this.zone_id
    evaluate_target_health = true
  }
}

# -- ECS -----------------------------------------------------------------------------------------

resource "aws_ecs_cluster" "this" {
  name = var.name

  setting {
    name  = "containerInsights"
    value = "enabled"
  }

  tags = var.tags
}

resource "aws_ecs_task_definition" "this" {
  family                   = var.name
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.cpu
  memory                   = var.memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.cpu_architecture
  }

  # The root file system is read-only; the rendered configuration goes to this scratch volume.
  volume {
    name = "scratch"
  }

  container_definitions = jsonencode([
    {
      name      = local.container_name
      image     = var.image
      essential = true
      # The image's own entrypoint is replaced by the repository's (passed inline: no bind mounts
      # on Fargate). "$@" of the script is the command, pgbouncer's path.
      entryPoint             = ["/bin/sh", "-c", local.entrypoint_script, "pgbouncer-entrypoint"]
      command                = ["/usr/bin/pgbouncer"]
      readonlyRootFilesystem = true
      privileged             = false
      portMappings = [
        { containerPort = var.listen_port, protocol = "tcp" },
      ]
      mountPoints = [
        { sourceVolume = "scratch", containerPath = "/tmp", readOnly = false },
      ]
      environment = local.environment
      secrets     = local.secrets
      ulimits = [
        # max_client_conn plus server connections need more than 1024 descriptors.
        { name = "nofile", softLimit = 65535, hardLimit = 65535 },
      ]
      healthCheck = {
        command     = ["CMD", "pg_isready", "--host=127.0.0.1", "--port=${var.listen_port}"]
        interval    = 10
        timeout     = 3
        retries     = 3
        startPeriod = 10
      }
      # SIGTERM makes PgBouncer stop taking clients and wait for transactions to end.
      stopTimeout = 60
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          awslogs-group         = aws_cloudwatch_log_group.this.name
          awslogs-region        = local.region
          awslogs-stream-prefix = "pgbouncer"
        }
      }
    },
  ])

  tags = var.tags

  lifecycle {
    precondition {
      condition     = local.shared_settings["pool_mode"] == "transaction" && local.shared_settings["auth_type"] == "scram-sha-256"
      error_message = "The PgBouncer settings file must set pool_mode = transaction and auth_type = scram-sha-256."
    }
    precondition {
      condition     = tonumber(local.shared_settings["max_prepared_statements"]) > 0
      error_message = "The PgBouncer settings file must set max_prepared_statements > 0 (named prepared statements in transaction mode)."
    }
    precondition {
      condition     = local.per_task_pool >= 1
      error_message = "server_pool_total (${var.server_pool_total}) must be at least max_tasks (${var.max_tasks}): every task needs one server connection."
    }
    precondition {
      condition     = local.max_client_conn * var.min_tasks >= var.min_client_capacity
      error_message = "max_client_conn x min_tasks is below min_client_capacity (${var.min_client_capacity})."
    }
  }
}

resource "aws_ecs_service" "this" {
  name             = var.name
  cluster          = aws_ecs_cluster.this.id
  task_definition  = aws_ecs_task_definition.this.arn
  desired_count    = var.min_tasks
  launch_type      = "FARGATE"
  platform_version = "LATEST"
  propagate_tags   = "SERVICE"

  # Never more tasks than desired, even while deploying: the server pool is divided for max_tasks,
  # and a surge of extra tasks would open connections beyond server_pool_total.
  deployment_minimum_healthy_percent = 50
  deployment_maximum_percent         = 100
  health_check_grace_period_seconds  = 30

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  network_configuration {
    subnets          = var.subnet_ids
    security_groups  = [aws_security_group.tasks.id]
    assign_public_ip = false
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.this.arn
    container_name   = local.container_name
    container_port   = var.listen_port
  }

  tags = var.tags

  lifecycle {
    # Autoscaling owns the task count after creation.
    ignore_changes = [desired_count]
  }

  depends_on = [aws_lb_listener.this, aws_iam_role_policy.execution]
}

# -- autoscaling on CPU (PgBouncer is single-threaded: CPU is what runs out first) ---------------

resource "aws_appautoscaling_target" "this" {
  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.this.name}/${aws_ecs_service.this.name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = var.min_tasks
  max_capacity       = var.max_tasks
  tags               = var.tags
}

resource "aws_appautoscaling_policy" "cpu" {
  name               = "${var.name}-cpu"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = aws_appautoscaling_target.this.service_namespace
  resource_id        = aws_appautoscaling_target.this.resource_id
  scalable_dimension = aws_appautoscaling_target.this.scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value = var.cpu_target_percent
    # Scale out fast; scale in slowly: every task removed drops its clients' connections.
    scale_out_cooldown = 60
    scale_in_cooldown  = 600

    predefined_metric_specification {
      predefined_metric_type = "ECSServiceAverageCPUUtilization"
    }
  }
}
