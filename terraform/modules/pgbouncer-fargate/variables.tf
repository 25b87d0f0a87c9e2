variable "name" {
  description = "Name of the service and prefix of everything this module creates (letters, digits, hyphens; starts with a letter; at most 28 characters so the load balancer name fits)."
  type        = string

  validation {
    condition     = can(regex("^[a-zA-Z](-?[a-zA-Z0-9])*$", var.name)) && length(var.name) <= 28
    error_message = "name must start with a letter, hold only letters, digits and single hyphens, not end with a hyphen, and be at most 28 characters."
  }
}

variable "vpc_id" {
  description = "VPC of the database, PgBouncer and its clients."
  type        = string

  validation {
    condition     = can(regex("^vpc-[0-9a-f]+$", var.vpc_id))
    error_message = "vpc_id must look like vpc-0123456789abcdef0."
  }
}

variable "subnet_ids" {
  description = "Private subnets for the load balancer and the tasks, in at least two Availability Zones."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) >= 2 && alltrue([for s in var.subnet_ids : can(regex("^subnet-[0-9a-f]+$", s))])
    error_message = "subnet_ids needs at least two subnet-... ids."
  }
}

variable "client_security_group_ids" {
  description = "Security groups of the clients (Lambda functions) allowed to connect to PgBouncer."
  type        = list(string)

  validation {
    condition     = length(var.client_security_group_ids) >= 1 && alltrue([for s in var.client_security_group_ids : can(regex("^sg-[0-9a-f]+$", s))])
    error_message = "client_security_group_ids needs at least one sg-... id."
  }
}

variable "db_host" {
  description = "Host name of the PostgreSQL server (RDS instance or Aurora writer endpoint)."
  type        = string

  validation {
    condition     = length(var.db_host) > 0
    error_message = "db_host must not be empty."
  }
}

variable "db_port" {
  description = "Port PostgreSQL listens on."
  type        = number
  default     = 5432

  validation {
    condition     = var.db_port >= 1 && var.db_port <= 65535 && floor(var.db_port) == var.db_port
    error_message = "db_port must be a whole number between 1 and 65535."
  }
}

variable "db_security_group_id" {
  description = "Security group of the database: the module lets the PgBouncer tasks reach it on db_port."
  type        = string

  validation {
    condition     = can(regex("^sg-[0-9a-f]+$", var.db_security_group_id))
    error_message = "db_security_group_id must look like sg-0123456789abcdef0."
  }
}

variable "db_username" {
  description = "PostgreSQL role the application logs in as; it must match the username in db_credentials_secret_arn."
  type        = string
  default     = "app"

  validation {
    condition     = can(regex("^[a-z_][a-z0-9_]{0,62}$", var.db_username)) && !contains(["postgres", "rdsadmin"], var.db_username)
    error_message = "db_username must be a lower-case PostgreSQL identifier of at most 63 characters and not a superuser role."
  }
}

variable "db_credentials_secret_arn" {
  description = "Secrets Manager secret with the application's login, JSON {\"username\": ..., \"password\": ...} (the format RDS and its rotation functions use). PgBouncer checks clients' SCRAM-SHA-256 logins against it and logs in to PostgreSQL with it. After a rotation, redeploy the service (aws ecs update-service --force-new-deployment)."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+$", var.db_credentials_secret_arn))
    error_message = "db_credentials_secret_arn must be a Secrets Manager secret ARN."
  }
}

variable "stats_credentials_secret_arn" {
  description = "Optional secret, JSON {\"password\": ...}, for PgBouncer's read-only console user pgb_stats (SHOW POOLS, SHOW STATS: for asyncpool doctor or a metrics exporter). It is a stats user, not an admin: it cannot PAUSE, KILL or SHUTDOWN. No admin user is ever configured, since the console is reachable from every client network. Null: no console user."
  type        = string
  default     = null

  validation {
    condition     = var.stats_credentials_secret_arn == null || can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+$", var.stats_credentials_secret_arn))
    error_message = "stats_credentials_secret_arn must be null or a Secrets Manager secret ARN."
  }
}

variable "tls_secret_arn" {
  description = "Secret with PgBouncer's TLS server certificate, JSON {\"certificate\": PEM chain, \"private_key\": PEM}. Issue it for dns_name (or the load balancer's name) from a CA your functions trust (for example AWS Private CA) and ship that CA with the function (ASYNCPOOL_SSL_ROOT_CERT)."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+$", var.tls_secret_arn))
    error_message = "tls_secret_arn must be a Secrets Manager secret ARN."
  }
}

variable "kms_key_arn" {
  description = "Customer-managed KMS key that encrypts the secrets above and the service's log group (its key policy must let logs.<region>.amazonaws.com use it)."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[0-9a-f-]+$", var.kms_key_arn))
    error_message = "kms_key_arn must be a KMS key ARN (arn:aws:kms:<region>:<account>:key/<id>)."
  }
}

variable "server_tls_sslmode" {
  description = "TLS from PgBouncer to PostgreSQL: verify-full (the default: certificate and host name checked against server_tls_ca_pem) or verify-ca (certificate only). PgBouncer holds the application's password in plain text and logs in with it, so the database's identity is always verified."
  type        = string
  default     = "verify-full"

  validation {
    condition     = contains(["verify-ca", "verify-full"], var.server_tls_sslmode)
    error_message = "server_tls_sslmode must be verify-full or verify-ca: PgBouncer sends the application's password to the database, which must prove who it is."
  }
}

variable "server_tls_ca_pem" {
  description = "CA bundle (PEM) that signs the database's certificate: for RDS the regional bundle, https://truststore.pki.rds.amazonaws.com/<region>/<region>-bundle.pem (the global bundle is too large for a task definition)."
  type        = string

  validation {
    condition     = strcontains(var.server_tls_ca_pem, "-----BEGIN CERTIFICATE-----") && length(var.server_tls_ca_pem) <= 32768
    error_message = "server_tls_ca_pem must be PEM certificates (at most 32 KiB: use the regional RDS bundle)."
  }
}

variable "image" {
  description = "PgBouncer image pinned by digest (name@sha256:...): build deploy/pgbouncer/Dockerfile (Debian trixie's PgBouncer 1.24.1 with the 2025-2026 CVE fixes, /bin/sh and pg_isready), push it to your ECR repository and pass the pushed digest. A tag can be moved to other content; a digest cannot."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}$", var.image))
    error_message = "image must be pinned by digest (registry/name@sha256:<64 hex digits>); a tag alone can be moved to other content."
  }
}

variable "ecr_repository_arn" {
  description = "ECR repository the image is pulled from, if any: the execution role gets pull rights on it alone."
  type        = string
  default     = null

  validation {
    condition     = var.ecr_repository_arn == null || can(regex("^arn:aws[a-z-]*:ecr:[a-z0-9-]+:[0-9]{12}:repository/.+$", coalesce(var.ecr_repository_arn, "-")))
    error_message = "ecr_repository_arn must be null or an ECR repository ARN."
  }
}

variable "cpu_architecture" {
  description = "CPU architecture of the tasks: X86_64 or ARM64 (the image must be built for it)."
  type        = string
  default     = "X86_64"

  validation {
    condition     = contains(["X86_64", "ARM64"], var.cpu_architecture)
    error_message = "cpu_architecture must be X86_64 or ARM64."
  }
}

variable "cpu" {
  description = "Fargate CPU units per task. PgBouncer uses one core at most, so 1024 lets the CPU scaling target mean what it says."
  type        = number
  default     = 1024

  validation {
    condition     = contains([256, 512, 1024, 2048, 4096], var.cpu)
    error_message = "cpu must be one of 256, 512, 1024, 2048, 4096."
  }
}

variable "memory" {
  description = "Fargate memory (MiB) per task."
  type        = number
  default     = 2048

  validation {
    condition     = var.memory >= 512 && var.memory <= 30720
    error_message = "memory must be between 512 and 30720 MiB."
  }
}

variable "min_tasks" {
  description = "Fewest PgBouncer tasks (at least two, in different zones, so one can fail)."
  type        = number
  default     = 2

  validation {
    condition     = var.min_tasks >= 2 && floor(var.min_tasks) == var.min_tasks
    error_message = "min_tasks must be a whole number >= 2."
  }
}

variable "max_tasks" {
  description = "Most PgBouncer tasks autoscaling may run. The server pool is divided between them, so more tasks never means more database connections."
  type        = number
  default     = 4

  validation {
    condition     = var.max_tasks >= 2 && var.max_tasks <= 50 && floor(var.max_tasks) == var.max_tasks
    error_message = "max_tasks must be a whole number between 2 and 50."
  }
}

variable "cpu_target_percent" {
  description = "Average CPU utilisation autoscaling keeps the service at."
  type        = number
  default     = 60

  validation {
    condition     = var.cpu_target_percent >= 10 && var.cpu_target_percent <= 90
    error_message = "cpu_target_percent must be between 10 and 90."
  }
}

variable "server_pool_total" {
  description = "Server connections to PostgreSQL for the whole service (about 50 serve 500+ concurrent functions). Each task gets floor(server_pool_total / max_tasks) as default_pool_size and max_db_connections."
  type        = number
  default     = 50

  validation {
    condition     = var.server_pool_total >= 2 && floor(var.server_pool_total) == var.server_pool_total
    error_message = "server_pool_total must be a whole number >= 2."
  }
}

variable "min_client_capacity" {
  description = "Client connections the service must accept with min_tasks running (max_client_conn x min_tasks); plan refuses a smaller configuration."
  type        = number
  default     = 500

  validation {
    condition     = var.min_client_capacity >= 1
    error_message = "min_client_capacity must be >= 1."
  }
}

variable "listen_port" {
  description = "Port of the load balancer and of PgBouncer in the tasks."
  type        = number
  default     = 6432

  validation {
    condition     = var.listen_port >= 1024 && var.listen_port <= 65535 && floor(var.listen_port) == var.listen_port
    error_message = "listen_port must be a whole number between 1024 and 65535 (PgBouncer runs unprivileged)."
  }
}

variable "settings_file" {
  description = "PgBouncer tuning file. Null: asyncpool/testing/pgbouncer.ini of this repository, the file the test harness and compose.yaml use."
  type        = string
  default     = null

  validation {
    condition     = var.settings_file == null || endswith(coalesce(var.settings_file, "-"), ".ini")
    error_message = "settings_file must be null or the path of a PgBouncer .ini file."
  }
}

variable "settings_overrides" {
  description = "PgBouncer settings replacing entries of settings_file for this deployment (the per-task pool sizes are set by the module)."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k in keys(var.settings_overrides) : can(regex("^[a-z_]+$", k))]) && length(setintersection(keys(var.settings_overrides), ["pool_mode", "auth_type", "default_pool_size", "max_db_connections"])) == 0
    error_message = "settings_overrides keys must be PgBouncer setting names; pool_mode and auth_type are fixed (transaction, scram-sha-256) and the pool sizes come from server_pool_total."
  }
}

variable "dns_name" {
  description = "Optional private DNS name for the service (the name its TLS certificate is issued for), created in route53_zone_id."
  type        = string
  default     = null

  validation {
    condition     = var.dns_name == null || can(regex("^([a-z0-9]([a-z0-9-]*[a-z0-9])?\\.)+[a-z0-9]([a-z0-9-]*[a-z0-9])?$", coalesce(var.dns_name, "-")))
    error_message = "dns_name must be null or a lower-case DNS name."
  }
}

variable "route53_zone_id" {
  description = "Private hosted zone for dns_name."
  type        = string
  default     = null

  validation {
    condition     = var.route53_zone_id == null || can(regex("^Z[A-Z0-9]+$", coalesce(var.route53_zone_id, "-")))
    error_message = "route53_zone_id must be null or a hosted zone id (Z...)."
  }
}

variable "log_retention_days" {
  description = "Days CloudWatch keeps PgBouncer's logs."
  type        = number
  default     = 365

  validation {
    condition     = contains([365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a CloudWatch retention value of at least one year (365, 400, 545, 731...)."
  }
}

variable "deletion_protection" {
  description = "Protect the load balancer from deletion."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags for every resource the module creates."
  type        = map(string)
  default     = {}
}
