terraform {
  # Terraform 1.11 like the rds-proxy module, so both modules share one toolchain;
  # aws_region.region (the region attribute) needs the AWS provider 6.
  required_version = ">= 1.11"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.0"
    }
  }
}
